"""Data: synthetic clips, Parquet shards (format, reader, writer), video decoding and encoding."""
