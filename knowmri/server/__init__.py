"""The web UI and its HTTP API (`knowmri serve`, SPEC §8); see `knowmri.server.app`."""
