"""Multi-node launcher tests on a loopback "cluster"."""
