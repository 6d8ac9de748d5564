"""The whole workflow as one command: recipes, the stage graph, and the report card."""
