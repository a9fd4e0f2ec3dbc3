"""Networking: neighbour links, circuit switching, greenlet lifecycles."""
