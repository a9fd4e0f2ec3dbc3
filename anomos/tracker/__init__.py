"""The tracker: identity, peer graph, neighbour assignment, tracking codes, HTTPS API."""
