"""phanes: screen brain MRI cohorts for anomalies with PHANES pseudo-healthy generative networks."""

__version__ = "0.1.0"
