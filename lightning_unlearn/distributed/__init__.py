"""Models larger than one device: FSDP2 sharding (:mod:`.sharding`) and the ``fsdp2`` strategy (:mod:`.strategy`)."""
