"""How results look: the result contract, figures, tables and the HTML page."""
