"""The request pipeline every protocol route shares: plan, fit, sample, admit, collect."""
