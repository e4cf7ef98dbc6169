// What sidp's AMX kernels share: the tile registers, which Linux grants a process only once it asks, and
// one tile configuration, every tile 16 rows of 64 bytes. Included where __AMX_TILE__ is defined.
#pragma once

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>

namespace sidp_tiles {

constexpr int64_t kTile = 16;  // a tile is 16 rows of 64 bytes: 16 rows by 32 bf16

// oneDNN asks too; asking twice is fine.
inline bool amx_allowed() {
  static const bool allowed =
      syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  return allowed;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// The configuration belongs to the thread, and oneDNN's products load their own, so each task loads this.
inline void load_tile_config() {
  TileConfig c;
  for (int t = 0; t < 8; ++t) {
    c.rows[t] = kTile;
    c.colsb[t] = 64;
  }
  _tile_loadconfig(&c);
}

}  // namespace sidp_tiles
