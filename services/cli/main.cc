#include <cstdio>
int main() { std::puts("cleave"); return 0; }
