"""One module per stage: its batch -> loss function, and its evaluation."""
