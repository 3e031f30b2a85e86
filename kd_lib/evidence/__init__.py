"""Evidence: records collected, summarised, tested as the paper's claims and drawn as the book's figures and tables."""
