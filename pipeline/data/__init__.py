"""The shard-set format and its reader (Spark-free): manifest, column specs, file formats, ShardReader."""
