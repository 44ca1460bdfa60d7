"""Pictures of grounded data and answers: boxes, masks and phrases drawn on the image."""

from .draw import add_caption, draw_record, draw_regions, draw_response

__all__ = ["add_caption", "draw_record", "draw_regions", "draw_response"]
