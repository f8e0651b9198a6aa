"""How every grammar of ours writes JSON (no torch: the serving side builds grammars too)."""

# compact: free whitespace lets a small model loop on blanks until max_tokens
COMPACT_JSON = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
