"""`mmgen tune`: the measured quality / cost front of a run on this machine, and a recipe chosen from it."""
