"""Small model architectures shipped with unic as worked examples of a user's own (`py:`) teacher."""
