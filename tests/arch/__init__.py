"""Architecture sweep: tiny Hugging Face models checked against an independent reference (a package)."""
