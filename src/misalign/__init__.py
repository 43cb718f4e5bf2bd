"""misalign: how cheaply fine-tuning removes safety alignment, and how expensively it comes back."""

__version__ = "0.1.0"
