// Peak TDPBF16PS rate of one core (4 independent C tiles, operands in tiles): the ceiling of the AMX GEMMs.
// Build: g++ -O2 -march=sapphirerapids -o /tmp/amxpeak benchmarks/micro/amx_peak.cpp
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <chrono>
#include <cstdio>
#include <cstdint>
struct TileCfg { uint8_t palette, start; uint8_t r[14]; uint16_t colsb[16]; uint8_t rows[16]; };
int main(){ syscall(SYS_arch_prctl,0x1023,18); TileCfg c{}; c.palette=1; for(int t=0;t<8;t++){c.rows[t]=16;c.colsb[t]=64;} _tile_loadconfig(&c);
 alignas(64) static uint16_t b[512]; for(int i=0;i<512;i++) b[i]=0x3f80; _tile_loadd(4,b,64); _tile_loadd(5,b,64);_tile_loadd(6,b,64);_tile_loadd(7,b,64);
 for(int t=0;t<4;t++); _tile_zero(0);_tile_zero(1);_tile_zero(2);_tile_zero(3);
 long n=2000000; auto t0=std::chrono::steady_clock::now();
 for(long i=0;i<n;i++){ _tile_dpbf16ps(0,4,6); _tile_dpbf16ps(1,5,6); _tile_dpbf16ps(2,4,7); _tile_dpbf16ps(3,5,7);}
 double s=std::chrono::duration<double>(std::chrono::steady_clock::now()-t0).count();
 printf("TDPBF16PS peak: %.1f G MAC/s (%.1f ns per instr)\n", n*4*8192.0/s/1e9, s/(n*4)*1e9); _tile_release(); }
