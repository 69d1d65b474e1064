"""Plumbing the programs share (environment parsing, loop choice, listening sockets).

``services`` and ``lb`` never import each other; what both need and that is not domain
logic lives here.
"""
