"""agentd: a long-running daemon that runs a custom AI voice agent on VoIPBIN."""

__version__ = "0.1.0"
