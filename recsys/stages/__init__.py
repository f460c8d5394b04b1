"""The recommendation stages as plain classes, shared by offline evaluation and the
services: candidate sources (recall channels), merge, filters, pre-rank, scoring, fusion,
rerank. Each stage has an `identifier` (its metric and log label)."""
