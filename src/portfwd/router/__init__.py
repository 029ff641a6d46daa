"""Router mapping: ask the home router itself (PCP, NAT-PMP, UPnP IGD) to forward a port here."""
