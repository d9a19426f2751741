module mixload

go 1.19
