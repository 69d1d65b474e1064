"""``make bench``: wrk and hey against the balancer, the service and the whole stack, side by side
with HAProxy; a markdown report and PNG plots in ``bench/results/``.  Run ``python -m bench``."""
