"""Results of batch requests: one neutral record a request (:mod:`.record`), built from the
upstream's answer (:mod:`.answer`), stored in part blobs in position order and read back with
:func:`batchd.results.reader.read_results`; rendered as OpenAI lines (:mod:`.openai`) or
Anthropic result lines (:mod:`.anthropic`)."""
