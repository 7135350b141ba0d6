"""The web UI and its HTTP API (`knowmri serve`, docs/SERVER.md); see `knowmri.server.app`."""
