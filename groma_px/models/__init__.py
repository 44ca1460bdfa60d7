"""The composed model ``GromaPX(BaseModel)``: composition only."""
