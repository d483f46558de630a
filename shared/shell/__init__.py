"""The trio shell: channels, transports, the driver around an actor core, the server, configuration."""
