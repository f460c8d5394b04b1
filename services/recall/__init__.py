"""The recall service: candidate generation from every channel, concurrently, under deadlines."""
