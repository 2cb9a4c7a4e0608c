"""Built-in inner losses."""
