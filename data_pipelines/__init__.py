"""Data pipelines: media -> versioned ArrayRecord shards (decode once), Grain pipelines, TFDS builder, synthetic
data."""
