"""Host-side (numpy) preprocessing that reproduces the HF processors of the frozen encoders."""
