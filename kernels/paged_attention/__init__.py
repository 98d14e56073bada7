"""Paged attention: K/V stored in fixed-size pages addressed through a page table per sequence."""
