"""Who is calling: users, consumer keys and agent tokens, the secret cache, portal JWTs and passwords,
form tokens."""
