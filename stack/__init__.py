"""The compose topology as local processes (``make run``), usable as a library by tests."""

from stack.config import ConfigError, StackConfig
from stack.supervisor import Stack, StackError

__all__ = ["ConfigError", "Stack", "StackConfig", "StackError"]
