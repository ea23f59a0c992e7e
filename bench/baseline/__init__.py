"""The baseline: a voice agent written the way VoIPBIN's tutorial does it (webhooks)."""
