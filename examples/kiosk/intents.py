"""What the Northwind kiosk app handles itself: its intents and example utterances.

An app registers these with the edge agent; requests that match one are answered on the device
by the app's own handlers (cart, staff call, navigation) or by short local generation.
"""

from __future__ import annotations

KIOSK_INTENTS: dict[str, list[str]] = {
    "greet": [
        "hello",
        "hi",
        "hey there",
        "good morning",
        "good afternoon",
        "good evening",
        "hello, can you help me",
        "hey, how are you",
    ],
    "thanks": [
        "thank you",
        "thanks a lot",
        "thanks, that helps",
        "cheers",
        "great, thanks",
        "ok great",
        "nice one",
    ],
    "goodbye": ["bye", "goodbye", "see you later", "i'm done", "thanks, bye", "no thanks"],
    "help": ["help", "what can you do", "how does this kiosk work", "i need help"],
    "call_staff": [
        "call an assistant",
        "can a staff member come here",
        "i want to talk to a person",
        "get me an employee",
    ],
    "cart_show": ["show my cart", "what's in my basket", "open my cart", "view basket"],
    "cart_add": [
        "add this to my cart",
        "put the backpack in my basket",
        "add two of these to my cart",
    ],
    "cart_remove": ["remove the socks from my cart", "take this out of my basket", "empty my cart"],
    "wishlist": ["add this to my wishlist", "show me my wishlist", "save for later"],
    "checkout": ["checkout please", "i want to pay now", "go to checkout"],
    "orders": ["open my orders", "show my past orders"],
    "navigate": ["start over", "go back to the home screen", "go back", "main menu"],
    "accessibility": [
        "make the text bigger",
        "switch the language to spanish",
        "larger font please",
    ],
    "member_card": ["scan my member card", "log in with my loyalty card"],
    "smalltalk": ["are you a robot", "what's your name", "who are you", "yes", "no"],
}

# What the kiosk app does for the intents it handles itself (it would also drive its screens).
KIOSK_REPLIES: dict[str, str] = {
    "greet": "Hello! Welcome to Northwind Outfitters. How can I help you today?",
    "thanks": "You're welcome! Anything else I can do for you?",
    "goodbye": "Goodbye, and enjoy your day outdoors!",
    "help": "I can answer questions about our products and policies, manage your cart, "
    "or call a member of staff.",
    "call_staff": "A member of staff is on the way to this kiosk.",
    "cart_show": "Here is your cart.",
    "cart_add": "Added to your cart.",
    "cart_remove": "Removed from your cart.",
    "wishlist": "Your wishlist is open.",
    "checkout": "Taking you to checkout.",
    "orders": "Here are your orders.",
    "navigate": "Back to the home screen.",
    "accessibility": "Display settings updated.",
    "member_card": "Please hold your member card under the scanner.",
}
