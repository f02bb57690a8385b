"""`honelm serve`: a run's model behind the OpenAI API and a web page (engine: batching; api: HTTP; main: the command)."""
