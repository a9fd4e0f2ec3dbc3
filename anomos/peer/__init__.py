"""The peer: seeder, downloader and relay roles over neighbour links."""
