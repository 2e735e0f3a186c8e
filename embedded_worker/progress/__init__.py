"""Progress out: the board the C# side polls, batch trackers, and the feed that keeps them."""
