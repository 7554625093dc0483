"""Building blocks of train.py: arguments, tokenizer and model loading, data, collators, metrics."""
