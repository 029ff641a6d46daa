"""SSH tunnels, client side: -L, -R and -D through an SSH server, kept up by reconnecting."""
