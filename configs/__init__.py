"""ml_collections config files for the three training stages (``--config=configs/<stage>.py[:variant]``)."""
