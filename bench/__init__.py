"""`make bench`: agentd against the VoIPBIN simulator over loopback (see bench/REPORT.md)."""
