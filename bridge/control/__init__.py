"""Control surfaces: the OSC server and status feedback (later OSCQuery and MIDI). No torch here."""
