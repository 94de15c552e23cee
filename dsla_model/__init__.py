"""The hybrid model: DSLA attention, hybrid Llama wrapper, hybrid cache, model loading,
corpus, sensitivity order and the generation engine. No Ray here."""
