"""Names shared by the accounting core, the CLI and the magics (cheap to import)."""

SAMPLINGS = ("poisson", "shuffle")
ACCOUNTANTS = ("pld", "rdp")
