"""Who offers what at what price: the model directory, connected agents (the registry), an agent's
hello judged, the choice of an agent, the platform upstream, the body a backend gets and the reply a
consumer sees."""
