"""Small command modules of the ``calofm`` CLI (bigger commands live next to their subsystem)."""
