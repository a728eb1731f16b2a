"""From probabilities to answers: policies, sequences, and the JSON and v2 renderings."""
