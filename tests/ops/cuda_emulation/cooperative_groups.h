// cooperative_groups stand-in for the CPU emulation (see emu.h).
#pragma once
#include "emu.h"
