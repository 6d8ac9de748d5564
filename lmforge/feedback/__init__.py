"""Feedback: sampling responses and judging them (simulated annotators, people, AI judges)."""
